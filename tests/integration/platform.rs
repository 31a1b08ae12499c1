//! The reference platform (`environments/`, `modules/`, `policies/` of this repository)
//! planned and applied against moto, answering as the dev environment's account.

use std::path::Path;

use crate::support::{
    ConfigRepo, Moto, apply_saved_plan, plan_env, plan_record, require_terraform_and_moto,
};

const DEV_ACCOUNT: &str = "210987654321";

/// moto answering as dev's account, with AWS's managed policies loaded (EKS roles attach them).
fn dev_moto() -> Moto {
    Moto::start_with(DEV_ACCOUNT, &[("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")])
}

/// A git config repository holding a copy of this project's reference platform, with `main`
/// and a `dev` branch. `edit` may change the dev environment's karrots.yaml first.
fn reference_repo(edit: impl FnOnce(&str) -> String) -> ConfigRepo {
    let project = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = ConfigRepo::empty();
    for folder in ["environments", "modules", "policies"] {
        copy_tree(&project.join(folder), &repo.path().join(folder));
    }
    let dev = repo.path().join("environments/dev/karrots.yaml");
    let text = std::fs::read_to_string(&dev).unwrap();
    std::fs::write(&dev, edit(&text)).unwrap();
    repo.init_git();
    repo.git(&["branch", "dev"]);
    repo
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != ".terraform" {
                copy_tree(&entry.path(), &target);
            }
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Plans `env` at the `dev` branch: the plan must have changes. Returns the run and its record.
fn plan_changes(
    repo: &ConfigRepo,
    env: &str,
    moto: &Moto,
    state: &Path,
) -> (crate::support::Run, karrots::terraform::PlanRecord) {
    let run = plan_env(repo, env, moto, state, &["--rev", "dev"]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    let record = plan_record(state, env, &repo.git(&["rev-parse", "dev"]));
    (run, record)
}

/// The addresses a plan changes.
fn addresses(record: &karrots::terraform::PlanRecord) -> Vec<&str> {
    record
        .summary
        .resources
        .iter()
        .map(|r| r.address.as_str())
        .collect()
}

fn assert_planned(addresses: &[&str], expected: &[&str]) {
    for each in expected {
        assert!(
            addresses.contains(each),
            "{each} is not planned: {addresses:?}"
        );
    }
}

#[test]
fn the_reference_dev_environment_plans_against_moto() {
    require_terraform_and_moto();
    let moto = dev_moto();
    let repo = reference_repo(str::to_string);
    let state = tempfile::tempdir().unwrap();
    let (run, record) = plan_changes(&repo, "dev", &moto, state.path());
    let addresses = addresses(&record);
    assert_planned(
        &addresses,
        &[
            "module.network.aws_vpc.main",
            "module.network.aws_nat_gateway.main[0]",
            "module.eks[0].aws_eks_cluster.main",
            "module.eks[0].aws_eks_node_group.default",
            "module.ecr[0].aws_ecr_repository.main",
            "module.audit[0].aws_cloudtrail.main",
            "module.state[0].aws_dynamodb_table.lock",
            // What the scanners asked for: one key, flow logs, a closed default group,
            // control-plane and trail logs, access logs of the buckets.
            "aws_kms_key.platform",
            "module.network.aws_flow_log.main",
            "module.network.aws_default_security_group.main",
            "module.eks[0].aws_cloudwatch_log_group.control_plane",
            "module.audit[0].module.trail_logs.aws_cloudwatch_log_group.this",
            "module.access_logs[0].aws_s3_bucket.logs",
            "module.state[0].aws_s3_bucket_logging.state",
            "module.audit[0].aws_s3_bucket_logging.trail",
        ],
    );
    assert_eq!(
        record.summary.add,
        addresses.len(),
        "a fresh environment only creates"
    );
    assert!(
        run.stdout.contains(&format!(
            "Plan: {} to add, 0 to change, 0 to destroy",
            addresses.len()
        )),
        "{}",
        run.stdout
    );
    eprintln!(
        "reference dev environment: {} resources planned",
        addresses.len()
    );
}

#[test]
fn the_workers_own_identity_is_an_environment_of_its_own() {
    require_terraform_and_moto();
    let moto = dev_moto();
    let repo = reference_repo(str::to_string);
    let state = tempfile::tempdir().unwrap();
    let (_, record) = plan_changes(&repo, "karrots-iam-dev", &moto, state.path());
    let addresses = addresses(&record);
    assert_planned(
        &addresses,
        &[
            "aws_iam_policy.boundary",
            "aws_iam_group.worker",
            "aws_iam_policy.worker[\"karrots-worker-iam\"]",
            "aws_iam_user.worker[\"ci\"]",
        ],
    );
    // The platform, applied by the worker, no longer touches the worker's identity.
    let platform = plan_env(&repo, "dev", &moto, state.path(), &["--rev", "dev"]);
    assert!(
        !platform.stdout.contains("aws_iam_group") && !platform.stdout.contains("worker_iam"),
        "{}",
        platform.stdout
    );
}

#[tokio::test]
async fn the_platform_applies_against_moto_including_dns_delegation_and_peering() {
    require_terraform_and_moto();
    let moto = dev_moto();
    // What the other accounts would hold: the primary zone, the warehouse VPC and its database
    // security group. (moto answers every account here as the same one.)
    let zone: serde_json::Value = serde_json::from_str(&moto.aws(&[
        "route53",
        "create-hosted-zone",
        "--name",
        "example.com",
        "--caller-reference",
        "karrots-test",
    ]))
    .unwrap();
    let zone_id = zone["HostedZone"]["Id"]
        .as_str()
        .unwrap()
        .trim_start_matches("/hostedzone/")
        .to_string();
    let vpc: serde_json::Value =
        serde_json::from_str(&moto.aws(&["ec2", "create-vpc", "--cidr-block", "172.16.0.0/16"]))
            .unwrap();
    let data_vpc = vpc["Vpc"]["VpcId"].as_str().unwrap().to_string();
    let group: serde_json::Value = serde_json::from_str(&moto.aws(&[
        "ec2",
        "create-security-group",
        "--group-name",
        "warehouse",
        "--description",
        "warehouse db",
        "--vpc-id",
        &data_vpc,
    ]))
    .unwrap();
    let data_group = group["GroupId"].as_str().unwrap().to_string();

    // moto 5.2 cannot start a CloudTrail trail by ARN (StartLogging answers 500), so the audit
    // module is left out of this apply; it is planned in the test above.
    let extra = format!(
        "    audit: false\n    dns: {{ account_id: \"{DEV_ACCOUNT}\", parent_domain: example.com, parent_zone_id: {zone_id} }}\n    data_peering: {{ account_id: \"{DEV_ACCOUNT}\", vpc_id: {data_vpc}, vpc_cidr_block: 172.16.0.0/16, security_group_id: {data_group} }}\n"
    );
    let repo = reference_repo(|text| text.replace("    audit: true\n", &extra));
    let state = tempfile::tempdir().unwrap();

    // First the worker's identity (with the boundary), as its own environment would.
    let (_, record) = plan_changes(&repo, "karrots-iam-dev", &moto, state.path());
    apply_saved_plan(state.path(), &record, &moto)
        .await
        .expect("the worker's identity applies to moto");

    let (_, record) = plan_changes(&repo, "dev", &moto, state.path());
    apply_saved_plan(state.path(), &record, &moto)
        .await
        .expect("the platform applies to moto");
    for role in ["karrots-dev-cluster", "karrots-dev-node"] {
        let found = moto.aws(&["iam", "get-role", "--role-name", role]);
        assert!(
            found.contains(&format!(
                "arn:aws:iam::{DEV_ACCOUNT}:policy/karrots-worker-boundary"
            )),
            "{role} does not carry the boundary: {found}"
        );
    }
    eprintln!(
        "applied {} resources of the dev platform to moto",
        record.summary.add
    );

    // What was built, seen through the AWS API.
    let cluster: serde_json::Value =
        serde_json::from_str(&moto.aws(&["eks", "describe-cluster", "--name", "karrots-dev"]))
            .unwrap();
    let cluster = &cluster["cluster"];
    assert_eq!(cluster["status"], "ACTIVE", "{cluster}");
    assert_eq!(
        cluster["resourcesVpcConfig"]["endpointPublicAccess"], false,
        "the API endpoint is private by default: {cluster}"
    );
    assert_eq!(
        cluster["encryptionConfig"][0]["resources"],
        serde_json::json!(["secrets"]),
        "{cluster}"
    );
    let repositories = moto.aws(&["ecr", "describe-repositories"]);
    assert!(repositories.contains("\"repositoryName\": \"karrots-dev\""));
    assert!(repositories.contains("\"imageTagMutability\": \"IMMUTABLE\""));
    assert!(repositories.contains("\"scanOnPush\": true"));
    let flow_logs = moto.aws(&["ec2", "describe-flow-logs"]);
    assert!(
        flow_logs.contains("/karrots/karrots-dev/vpc-flow-logs"),
        "{flow_logs}"
    );
    let backups = moto.aws(&[
        "dynamodb",
        "describe-continuous-backups",
        "--table-name",
        "karrots-dev-tflock",
    ]);
    assert!(
        backups.contains("\"PointInTimeRecoveryStatus\": \"ENABLED\""),
        "{backups}"
    );
    let encryption = moto.aws(&[
        "s3api",
        "get-bucket-encryption",
        "--bucket",
        &format!("karrots-dev-tfstate-{DEV_ACCOUNT}"),
    ]);
    assert!(encryption.contains("aws:kms"), "{encryption}");
    let logging = moto.aws(&[
        "s3api",
        "get-bucket-logging",
        "--bucket",
        &format!("karrots-dev-tfstate-{DEV_ACCOUNT}"),
    ]);
    assert!(
        logging.contains(&format!("karrots-dev-access-logs-{DEV_ACCOUNT}")),
        "{logging}"
    );
    let records = moto.aws(&[
        "route53",
        "list-resource-record-sets",
        "--hosted-zone-id",
        &zone_id,
    ]);
    assert!(
        records.contains("karrots-dev.example.com."),
        "no delegation in the primary zone: {records}"
    );
    let peering = moto.aws(&["ec2", "describe-vpc-peering-connections"]);
    assert!(peering.contains(&data_vpc), "{peering}");
    let rules = moto.aws(&[
        "ec2",
        "describe-security-groups",
        "--group-ids",
        &data_group,
    ]);
    assert!(
        rules.contains("10.10.0.0/16"),
        "the warehouse does not admit the Karrots CIDR: {rules}"
    );
    assert!(
        moto.aws(&["iam", "get-group", "--group-name", "karrots-worker"])
            .contains("karrots-worker-ci")
    );
    assert!(
        moto.aws(&["dynamodb", "list-tables"])
            .contains("karrots-dev-tflock")
    );
    assert!(
        moto.aws(&["s3api", "list-buckets"])
            .contains(&format!("karrots-dev-tfstate-{DEV_ACCOUNT}"))
    );

    // Applied means in sync: the next plan of the same commit has nothing to do, but for one
    // artifact of moto: it reports every node group with a `remote_access { ec2_ssh_key =
    // "eksKeypair" }` block nobody asked for, which forces terraform to replace it.
    let (again, replanned) = plan_changes(&repo, "dev", &moto, state.path());
    let changed = addresses(&replanned);
    assert_eq!(
        changed,
        ["module.eks[0].aws_eks_node_group.default"],
        "{}",
        again.stdout
    );
}

//! The merged lane's worker against a real config repository, mirror and store, with
//! terraform and AWS scripted ([`Scripted`], [`ScriptedSts`]): what a commit's runs record
//! when a plan or an identity fails once, fails for good, is overtaken by a newer commit, or
//! is cut off by a kill — with no terraform and no AWS.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::aws::{AwsError, RunIdentity};
use crate::config::{AwsTarget, EnvName, parse_daemon_config};
use crate::engine::machine::Event;
use crate::git::testing::{commit_all, git, write};
use crate::repo::CheckedEnvironment;
use crate::store::OutboxKind;
use crate::terraform::plan::{PlanSummary, ResourceChange};
use crate::terraform::{PlanRecord, RunEnvironment, RunId, TerraformError, Workdir};

use super::merged::{MergedLane, merged};
use super::steps::WorkResult;
use super::world::{Identities, Pending, Runner, World};
use super::*;

/// What a scripted terraform command does.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// Succeeds (a plan creates one resource).
    Succeed,
    /// Fails with this on stderr.
    Fail(&'static str),
    /// Never ends: the daemon is killed while it runs.
    Hang,
}

/// Terraform that plays its script: each plan and apply takes the next act of its queue,
/// and succeeds once the queue is empty.
#[derive(Default)]
struct Scripted {
    plans: Mutex<VecDeque<Act>>,
    applies: Mutex<VecDeque<Act>>,
    /// The commits of the plans made and of the plans applied, in order.
    planned: Mutex<Vec<String>>,
    applied: Mutex<Vec<String>>,
}

impl Scripted {
    fn next(queue: &Mutex<VecDeque<Act>>) -> Act {
        queue.lock().unwrap().pop_front().unwrap_or(Act::Succeed)
    }

    async fn act(act: Act, step: &'static str, commit: &CommitId) -> Result<(), TerraformError> {
        match act {
            Act::Succeed => Ok(()),
            Act::Fail(stderr) => Err(TerraformError::Failed {
                step,
                env: "prod".into(),
                commit: commit.to_string(),
                code: "1".into(),
                stderr: stderr.into(),
            }),
            Act::Hang => std::future::pending().await,
        }
    }
}

impl Runner for Scripted {
    fn plan<'a>(
        &'a self,
        workdir: &'a Workdir,
        checked: &'a CheckedEnvironment,
        commit: &'a CommitId,
        run: &'a RunId,
        _: &'a RunEnvironment,
        _: &'a CancellationToken,
    ) -> Pending<'a, Result<PlanRecord, TerraformError>> {
        let act = Scripted::next(&self.plans);
        Box::pin(async move {
            Scripted::act(act, "plan", commit).await?;
            self.planned.lock().unwrap().push(commit.to_string());
            let create = ResourceChange {
                address: "terraform_data.app".into(),
                actions: vec!["create".into()],
            };
            Ok(PlanRecord {
                env: checked.spec.name.to_string(),
                commit: commit.to_string(),
                lane: Lane::Merged,
                run_id: run.clone(),
                plan_sha256: String::new(),
                fingerprint: checked.fingerprint.to_string(),
                inputs: checked.inputs.clone(),
                root_module: checked.spec.terraform.root.clone(),
                summary: PlanSummary {
                    add: 1,
                    resources: vec![create],
                    ..PlanSummary::default()
                },
                plan_dir: workdir.plan_dir(run),
                init_reused: false,
            })
        })
    }

    fn apply<'a>(
        &'a self,
        _: &'a Workdir,
        record: &'a PlanRecord,
        _: &'a RunEnvironment,
        _: &'a CancellationToken,
    ) -> Pending<'a, Result<(), TerraformError>> {
        let act = Scripted::next(&self.applies);
        Box::pin(async move {
            Scripted::act(act, "apply", &CommitId::from_hex(&record.commit)).await?;
            self.applied.lock().unwrap().push(record.commit.clone());
            Ok(())
        })
    }

    fn show_json<'a>(
        &'a self,
        _: &'a Workdir,
        _: &'a PlanRecord,
        _: &'a RunEnvironment,
        _: &'a CancellationToken,
    ) -> Pending<'a, Result<String, TerraformError>> {
        Box::pin(async { Ok("{}".to_string()) })
    }

    fn discard_plan(&self, _: &PlanRecord) -> Result<(), TerraformError> {
        Ok(())
    }

    fn discard_preview(&self, _: &PlanRecord) -> Result<(), TerraformError> {
        Ok(())
    }
}

/// STS that answers, after failing as its script says.
#[derive(Default)]
struct ScriptedSts {
    failures: Mutex<VecDeque<AwsError>>,
}

impl Identities for ScriptedSts {
    fn establish<'a>(
        &'a self,
        env: &'a EnvName,
        target: &'a AwsTarget,
        _: Lane,
        _: &'a CommitId,
    ) -> Pending<'a, Result<RunIdentity, AwsError>> {
        let failure = self.failures.lock().unwrap().pop_front();
        Box::pin(async move {
            if let Some(failure) = failure {
                return Err(failure);
            }
            Ok(RunIdentity {
                caller_arn: Some(format!(
                    "arn:aws:sts::{}:assumed-role/karrots-{env}/test",
                    target.account_id.as_str()
                )),
                run_env: RunEnvironment::default(),
                credentials: None,
            })
        })
    }
}

fn sts_unreachable() -> AwsError {
    AwsError::CallerIdentity {
        env: "prod".into(),
        message: "dispatch failure: Connection refused (os error 111)".into(),
        passing: true,
    }
}

/// A daemon of one environment, `prod` on `main`, whose worker the test drives one event at
/// a time.
struct Daemon {
    dir: tempfile::TempDir,
    shared: Arc<Shared>,
    terraform: Arc<Scripted>,
    sts: Arc<ScriptedSts>,
    lane: MergedLane,
    stop: CancellationToken,
}

impl Daemon {
    fn new() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        write(
            &repo,
            "environments/prod/karrots.yaml",
            "apiVersion: karrots/v1\nname: prod\nbranch: main\naws:\n  account_id: \"123456789012\"\n  region: us-east-1\nterraform:\n  root: modules/app\n  backend: { local: {} }\n",
        );
        write(
            &repo,
            "modules/app/main.tf",
            "resource \"terraform_data\" \"app\" {\n  input = 1\n}\n",
        );
        commit_all(&repo, "prod");
        let text = format!(
            "repo: file://{}\nstate_dir: state\nsandbox: off\npreview: false\nalerts:\n  - webhook: http://127.0.0.1:9/alerts\n",
            repo.display()
        );
        let config = parse_daemon_config(&text, &dir.path().join("serve.yaml"), dir.path())
            .expect("the daemon configuration parses");
        let (terraform, sts) = (
            Arc::new(Scripted::default()),
            Arc::new(ScriptedSts::default()),
        );
        let world = World {
            runner: terraform.clone(),
            identities: sts.clone(),
        };
        let stop = CancellationToken::new();
        let (shared, _) = open(config, world, &stop).expect("the daemon opens its state");
        Daemon {
            dir,
            shared,
            terraform,
            sts,
            lane: MergedLane::default(),
            stop,
        }
    }

    /// STS cannot be reached at the next call.
    fn sts_fails_once(&self) {
        self.sts
            .failures
            .lock()
            .unwrap()
            .push_back(sts_unreachable());
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// Commits a change of prod's module on `main`; fetches it as the main loop does and
    /// records the new head. Returns the commit.
    async fn push(&self, input: u32) -> CommitId {
        let repo = self.repo();
        write(
            &repo,
            "modules/app/main.tf",
            &format!("resource \"terraform_data\" \"app\" {{\n  input = {input}\n}}\n"),
        );
        let commit = commit_all(&repo, &format!("input {input}"));
        let mut poller = Poller::default();
        let heads = poller
            .fetch(&self.shared)
            .await
            .expect("the fetch succeeds")
            .heads;
        let specs = poller
            .trusted_specs(&self.shared, &heads, &Heads::default())
            .await
            .expect("the trust branch reads");
        self.shared.publish_trusted(specs);
        let head = HeadRow {
            env: "prod".into(),
            branch: "main".into(),
            head: commit.to_string(),
        };
        let store = self.shared.store.clone();
        store.record_heads(&[head]).unwrap();
        commit
    }

    async fn head(&mut self, commit: &CommitId) -> WorkResult {
        let event = Event::Head {
            commit: commit.to_string(),
        };
        merged(&self.shared, "prod", &mut self.lane, event, &self.stop).await
    }

    /// The retry the worker set, had now.
    async fn retry(&mut self) -> WorkResult {
        let event = self.lane.take_retry().expect("the worker set a retry");
        merged(&self.shared, "prod", &mut self.lane, event, &self.stop).await
    }

    fn status(&self) -> (EnvStatus, Option<String>) {
        let row = self.shared.store.environment("prod").unwrap().unwrap();
        (row.status, row.last_applied)
    }

    /// Each run, oldest first: (kind, result, commit).
    fn runs(&self) -> Vec<(RunKind, Option<RunResult>, String)> {
        let mut runs = self.shared.store.runs(Some("prod"), 100).unwrap();
        runs.reverse();
        runs.into_iter()
            .map(|run| (run.kind, run.result, run.commit))
            .collect()
    }

    /// The kinds of the alerts waiting in the outbox, oldest first.
    fn alerts(&self) -> Vec<String> {
        let due = self.shared.store.due(OutboxKind::Alert, i64::MAX).unwrap();
        due.iter()
            .map(|entry| {
                let body: serde_json::Value = serde_json::from_str(&entry.body).unwrap();
                body["kind"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }
}

#[tokio::test]
async fn a_commit_is_planned_applied_and_recorded_without_terraform() {
    let mut daemon = Daemon::new();
    let commit = daemon.push(2).await;
    daemon.head(&commit).await.unwrap();
    assert_eq!(
        daemon.status(),
        (EnvStatus::InSync, Some(commit.to_string()))
    );
    let at = commit.to_string();
    assert_eq!(
        daemon.runs(),
        [
            (RunKind::Plan, Some(RunResult::Changes), at.clone()),
            (RunKind::Apply, Some(RunResult::Applied), at.clone()),
        ]
    );
    assert_eq!(*daemon.terraform.applied.lock().unwrap(), [at]);
    assert_eq!(daemon.alerts(), ["applied"]);
    assert!(daemon.lane.retry_at.is_none());
}

#[tokio::test]
async fn sts_unreachable_at_the_plan_is_an_error_until_the_retry_applies_the_commit() {
    let mut daemon = Daemon::new();
    daemon.sts_fails_once();
    let commit = daemon.push(2).await;
    daemon.head(&commit).await.unwrap();
    assert_eq!(daemon.status().0, EnvStatus::Error, "not failed for good");
    assert!(daemon.lane.retry_at.is_some(), "a retry is set");
    assert!(daemon.terraform.planned.lock().unwrap().is_empty());
    let run = &daemon.shared.store.runs(Some("prod"), 1).unwrap()[0];
    assert_eq!(run.result, Some(RunResult::Failed));
    assert!(
        run.message.contains("Connection refused") && run.message.contains("tried again at"),
        "the run says why and when it is tried again: {}",
        run.message
    );

    daemon.retry().await.unwrap();
    assert_eq!(
        daemon.status(),
        (EnvStatus::InSync, Some(commit.to_string()))
    );
    assert_eq!(
        *daemon.terraform.applied.lock().unwrap(),
        [commit.to_string()]
    );
    assert!(daemon.lane.retry_at.is_none());
}

#[tokio::test]
async fn a_plan_that_fails_the_same_way_twice_is_failed_and_not_retried_again() {
    let mut daemon = Daemon::new();
    let unsupported = "Error: Unsupported argument \"inptu\"";
    daemon
        .terraform
        .plans
        .lock()
        .unwrap()
        .extend([Act::Fail(unsupported), Act::Fail(unsupported)]);
    let commit = daemon.push(2).await;
    daemon.head(&commit).await.unwrap();
    assert!(
        daemon.lane.retry_at.is_some(),
        "an unknown failure is tried once more"
    );
    daemon.retry().await.unwrap();
    assert_eq!(daemon.status().0, EnvStatus::Failed);
    assert!(
        daemon.lane.retry_at.is_none(),
        "the same failure twice is not retried"
    );
    assert!(daemon.terraform.applied.lock().unwrap().is_empty());
    // SPEC's one kind for a failed run; alerted at the streak's first failure and when
    // the retries give up, not at every attempt between.
    assert_eq!(daemon.alerts(), ["apply_failed", "apply_failed"]);
    let runs = daemon.runs();
    assert_eq!(runs.len(), 2, "one plan run per attempt: {runs:?}");
}

#[tokio::test]
async fn a_newer_commit_during_a_retry_is_the_one_applied() {
    let mut daemon = Daemon::new();
    daemon.sts_fails_once();
    let first = daemon.push(2).await;
    daemon.head(&first).await.unwrap();
    assert!(daemon.lane.retry_at.is_some());
    let second = daemon.push(3).await;
    daemon.head(&second).await.unwrap();
    assert_eq!(
        daemon.status(),
        (EnvStatus::InSync, Some(second.to_string()))
    );
    assert!(
        daemon.lane.retry_at.is_none(),
        "the newer commit replaced the retry"
    );
    assert_eq!(
        *daemon.terraform.planned.lock().unwrap(),
        [second.to_string()]
    );
    assert_eq!(
        *daemon.terraform.applied.lock().unwrap(),
        [second.to_string()]
    );
}

#[tokio::test]
async fn a_failed_apply_is_failed_alerted_and_never_applied_again() {
    let mut daemon = Daemon::new();
    let refused = "Error: creating EC2 VPC: UnauthorizedOperation";
    daemon
        .terraform
        .applies
        .lock()
        .unwrap()
        .push_back(Act::Fail(refused));
    let commit = daemon.push(2).await;
    daemon.head(&commit).await.unwrap();
    assert_eq!(daemon.status(), (EnvStatus::Failed, None));
    assert_eq!(daemon.runs()[1].1, Some(RunResult::Failed));
    assert_eq!(daemon.alerts(), ["apply_failed"]);
    assert!(
        daemon.lane.retry_at.is_none(),
        "an apply is never retried from its plan"
    );
}

/// Cut off at each terraform step (the worker's future dropped, as a kill would), then
/// started again: every run is closed, the environment says what happened, an apply cut off
/// is alerted once — the outcome's rows are all there, or none of them — and the head is
/// planned again and applied from its new plan.
#[tokio::test]
async fn a_kill_at_each_step_leaves_every_outcome_whole() {
    for (plans, applies, status, alerts) in [
        (Act::Hang, Act::Succeed, EnvStatus::Planning, vec![]),
        (
            Act::Succeed,
            Act::Hang,
            EnvStatus::Failed,
            vec!["apply_interrupted"],
        ),
    ] {
        let mut daemon = Daemon::new();
        daemon.terraform.plans.lock().unwrap().push_back(plans);
        daemon.terraform.applies.lock().unwrap().push_back(applies);
        let commit = daemon.push(2).await;
        let cut = tokio::time::timeout(Duration::from_millis(500), daemon.head(&commit)).await;
        assert!(
            cut.is_err(),
            "{plans:?}/{applies:?}: the run hangs until the kill"
        );

        interrupt_open_runs(&daemon.shared, None).await.unwrap();
        let runs = daemon.runs();
        assert!(
            runs.iter().all(|(_, result, _)| result.is_some()),
            "every run closed: {runs:?}"
        );
        assert_eq!(runs.last().unwrap().1, Some(RunResult::Interrupted));
        assert_eq!(daemon.status(), (status, None), "{plans:?}/{applies:?}");
        assert_eq!(daemon.alerts(), alerts, "{plans:?}/{applies:?}");
        assert!(daemon.terraform.applied.lock().unwrap().is_empty());

        // Started again, the main loop hands the head to a new worker.
        daemon.lane = MergedLane::default();
        daemon.head(&commit).await.unwrap();
        // It plans again and applies the new plan: the cut-off one is never applied.
        let at = commit.to_string();
        assert_eq!(daemon.status(), (EnvStatus::InSync, Some(at.clone())));
        let runs = daemon.runs();
        assert_eq!(
            runs[runs.len() - 2..],
            [
                (RunKind::Plan, Some(RunResult::Changes), at.clone()),
                (RunKind::Apply, Some(RunResult::Applied), at.clone()),
            ]
        );
        assert_eq!(*daemon.terraform.applied.lock().unwrap(), [at]);
    }
}

/// A thousand idle environments are a thousand waiting workers: each must hold only its
/// loop's state, never room for the deepest run it could make (those are boxed).
#[tokio::test]
async fn an_idle_worker_holds_a_few_hundred_bytes() {
    let daemon = Daemon::new();
    let queue = Arc::new(super::scheduler::Queue::new(Default::default()));
    let shared = daemon.shared.clone();
    let work = super::worker::work(
        shared,
        "prod".into(),
        Lane::Merged,
        queue,
        daemon.stop.clone(),
    );
    let size = std::mem::size_of_val(&work);
    assert!(size <= 1024, "an idle worker's future is {size} bytes");
}

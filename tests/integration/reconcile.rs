//! The reconciler's error policy and states: a passing failure is retried, a lasting one is
//! not, and each state says what the environment is waiting for.

use crate::support::daemon::Fixture;
use crate::support::{Moto, environment_yaml, free_port};

/// A daemon that starts before its AWS endpoint answers (seen with ten environments: one met
/// `Connection refused` from STS and stayed `failed` for good): the failure passes, so the
/// environment shows `error` with the time of the next attempt, one alert goes out for the
/// streak, and the commit is applied once the endpoint answers.
#[test]
fn a_daemon_started_before_its_aws_endpoint_answers_retries_and_applies() {
    let mut fixture = Fixture::build().unstarted();
    let port = free_port();
    fixture.moto.url = format!("http://127.0.0.1:{port}");
    fixture.start();
    let head = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod waiting for its endpoint", |f| {
        f.environment("prod")["status"] == "error"
    });
    let failed = fixture.runs("prod");
    let message = failed[0]["message"].as_str().unwrap_or_default();
    assert!(
        failed[0]["result"] == "failed"
            && message.contains("STS")
            && message.contains("a passing failure (attempt 1): tried again at"),
        "{failed:#?}"
    );

    fixture.moto = Moto::start_on(port, "123456789012", &[]);
    fixture.wait_for("prod applied once STS answers", |f| {
        f.applied("prod", &head)
    });
    let alerts = fixture.sink.all("prod", "apply_failed");
    assert_eq!(alerts.len(), 1, "one alert per streak: {alerts:#?}");
    assert!(
        alerts[0]["message"]
            .as_str()
            .unwrap()
            .contains("tried again at"),
        "{alerts:#?}"
    );
    let applies: Vec<_> = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["kind"] == "apply")
        .collect();
    assert_eq!(applies.len(), 1, "{applies:#?}");
    assert_eq!(applies[0]["result"], "applied");
    assert_eq!(fixture.environment("prod")["status"], "in_sync");
}

/// A new environment is `planning` from the moment its head is queued — not `in_sync` before
/// anything ran — and, with `apply.auto: false`, `awaiting_approval` once its plan has changes
/// (it said `in_sync`, with nothing applied). The one terraform permit is held by prod's slow
/// apply, so the new environment waits long enough to be seen waiting.
#[test]
fn a_new_environment_is_planning_until_planned_and_then_awaits_approval() {
    let mut fixture = Fixture::build()
        .prod_extra("allow: [local-exec]\n")
        .unstarted();
    fixture.concurrency = 1;
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod and dev applied", |f| {
        f.applied("prod", &first) && f.applied("dev", &first)
    });
    fixture.start_slow_apply(15);

    fixture.clone.write(
        "environments/qa/karrots.yaml",
        &environment_yaml("qa", "main", "modules/dev-app", "apply:\n  auto: false\n"),
    );
    fixture
        .clone
        .commit_all("qa, applied by hand approval only");
    fixture.push("main");
    let listed = |f: &Fixture| {
        f.get("/api/v1/environments")
            .as_array()
            .unwrap()
            .iter()
            .any(|env| env["name"] == "qa")
    };
    fixture.wait_for("qa listed", listed);
    let qa = fixture.environment("qa");
    assert_eq!(qa["status"], "planning", "{qa:#}");
    assert!(
        qa["last_run"].is_null() && qa["last_applied"].is_null(),
        "{qa:#}"
    );
    assert_eq!(
        fixture.environment("prod")["status"],
        "applying",
        "qa was seen while it waited for the permit"
    );

    fixture.wait_for("qa planned", |f| {
        f.environment("qa")["status"] == "awaiting_approval"
    });
    let runs = fixture.runs("qa");
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(
        (&runs[0]["kind"], &runs[0]["result"]),
        (&"plan".into(), &"changes".into())
    );
    assert!(fixture.environment("qa")["last_applied"].is_null());
}
